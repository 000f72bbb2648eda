"""The global-step engine: a pool of per-shard vector files in partitions, the one k-NN search, searcher
actors, k-means, connected components and the duplicate graph, and the retrieval algorithms."""
