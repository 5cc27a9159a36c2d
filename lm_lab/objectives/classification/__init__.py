"""``objective=classification``: sequence classification and regression on any network's plain forward."""
