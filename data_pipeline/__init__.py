"""Data for pretraining and evaluation: sources (ImageFolder, webdataset shards, FFCV .beton), the
exactly-once resumable loader, views with their crop geometry, shard writers, synthetic images."""
