"""The stages of a run: plain functions of a :class:`~dtrak.stages.run.Run`, each resumable.

=================  ==========================================================
module             stages
=================  ==========================================================
run                the run: directory, config, device, executor, context
basic              data, train, generate
featurize          featurize (and its shards as executor jobs)
pools              the training pools of the LDS and of pool-based methods
score              score
lds                lds, compare
counterfactual     counterfactual
attribute          attribute (any model and image folder, no run)
=================  ==========================================================

The order of ``dtrak run`` and the report stage are in :mod:`dtrak.pipeline`.
"""
