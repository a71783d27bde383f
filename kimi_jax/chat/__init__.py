"""Chat formatting: the tiktoken tokenizer, K2.5's special tokens, the chat template (rendered in a
sandbox with limits), conversation checks, tool declarations (JSON schema -> TypeScript), tool-call
ids (clients' ids to K2.5's functions.NAME:INDEX and back) and the output parser (reasoning, answer,
tool calls)."""
