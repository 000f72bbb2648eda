"""Reading and writing what the stages exchange: images, samples of the pool and the image sets, tar
members by key, URL lists and vector files."""
