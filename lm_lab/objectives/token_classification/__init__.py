"""``objective=token_classification``: a tag per word (part of speech, BIO entity tags) on any network's plain forward."""
