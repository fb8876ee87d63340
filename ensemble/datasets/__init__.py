"""The dataset readers behind `ensemble.data`: one file per source format, the decode cache and the Loader."""
