"""Glue to the ecosystem: PEFT (``peft``), the Trainer flag (``trainer``). Only this room knows them."""
