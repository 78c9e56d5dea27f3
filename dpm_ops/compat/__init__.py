"""Drop-in replacements for the evaluation functions of torchreid and fast-reid.

`dpm_ops.compat.torchreid` and `dpm_ops.compat.fastreid` each provide `evaluate_rank` and
`re_ranking` with the peer's signature, defaults and return types (numpy out), computed by
`dpm_ops.evaluation`, and the peer's other evaluation functions (torchreid's
`compute_distance_matrix`, and its `FeatureExtractor` for dpm_ops' models; fast-reid's `build_dist`, `compute_jaccard_distance`, which here needs
neither faiss nor a GPU, `aqe` and `evaluate_roc`). Where the peers are wrong the compat functions
are not (README, "Drop-in replacements for torchreid / fast-reid"):

* CMC past the last kept gallery item: the peers' Cython reads a stale buffer there (gallery
  smaller than max_rank with same-camera junk) and their Python code fails on the ragged rows;
  here the CMC stays at 1, the query having matched within the kept items.
* Precision: the peers' Cython casts float64 distances to float32 (merging close distances) and
  sums AP in float32; here float64 distances are ranked as they are and AP is float64.
* Ties: items at equal distance are ranked by gallery index (a stable sort), where the peers'
  numpy argsort order depends on the machine.
* use_metric_cuhk03: the single-gallery-shot draws are seeded (seed 0), theirs use numpy's
  global RNG; the CMC keeps min(max_rank, G) entries and stays at 1 past the number of gallery
  identities, where the peers' Cython drops to 0 and their Python code returns fewer entries.
* Bad input raises ValueError naming the argument (theirs: AssertionError or IndexError).
"""
