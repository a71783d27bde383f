"""Media for K2.5's vision: image and video preprocessing as Moonshot's processor does it,
and the media placeholders of prompts (one token-count function)."""
