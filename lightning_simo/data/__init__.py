"""lightning_simo.data: datasets and datamodules."""
