"""Training recipes: one folder per objective (settings, LightningModule, DataModule), listed in
``lm_lab.registry``."""
