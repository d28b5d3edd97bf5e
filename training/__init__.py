"""Training stages that produce every checkpoint the app serves; each imports the model from `inference`."""
