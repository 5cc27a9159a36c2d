"""Instruction fine-tuning of decoders (``objective=sft``): prompt/response pairs in a prompt template,
the loss on the response tokens only."""
