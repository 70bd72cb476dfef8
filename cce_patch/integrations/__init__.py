"""Glue to the libraries that train a patched model: the Trainer flag, callback and trainer (``trainer``), TRL's
trainers (``trl``; its wrappers, ``trl_wrappers``, installed by ``trl_hook`` when TRL is imported, armed by a
patch through ``arming``), TRL's fused LM head protocol on our kernel
(``fused_head``), and the sharded-training names kept for earlier versions (``distributed``). Only this room
imports transformers' Trainer and TRL; the models room never imports it."""
