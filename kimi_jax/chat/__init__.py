"""Chat formatting: the tiktoken tokenizer, K2.5's special tokens, the chat template (rendered in a
sandbox with limits), conversation checks, tool declarations (JSON schema -> TypeScript) and the
output parser (reasoning, answer, tool calls)."""
