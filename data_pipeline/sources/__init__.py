"""Where encoded images come from: an ImageFolder, webdataset tar shards, an FFCV .beton.
Each keeps the contract in ``base.py``; ``build.build_source`` picks one from the config."""
