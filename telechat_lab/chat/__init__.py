"""Chat with a TeleChat2 checkpoint (optionally with adapters, unmerged): generation engines
(transformers, vLLM) and the terminal loop / batch mode."""
