"""The TRAK math: per-example gradients projected to features (:mod:`.featurizer`,
:mod:`.projectors`), the kernel and its sources (:mod:`.kernel`, :mod:`.kernel_sources`), scores
(:mod:`.scoring`), and one checkpoint's pipeline over them (:mod:`.per_checkpoint`)."""
