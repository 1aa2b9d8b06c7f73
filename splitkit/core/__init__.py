"""The core a student reads first: the model, cut in three, with LoRA, and the task's data.

`models` loads a causal LM (SmolLM2 from its GGUF file, or a tiny one built from a config) and fingerprints it;
`split` cuts it into Bottom, Trunk and Top; `lora` puts PEFT's LoRA on the blocks each part trains and gives the
unsplit reference every check compares with; `data` makes the kit's task. Nothing here knows of a network:
this layer imports no other part of splitkit.
"""
