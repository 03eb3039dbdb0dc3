"""Model-based data quality: three small models trained here on real text, and the
dataproc steps that use them.

  classifier.py  fastText quality classifier (`zerolm data train-quality`):
                 encyclopedia/news-like text vs noisy user-generated text
  langid.py      fastText language identifier (`zerolm data train-langid`)
  ngram.py       interpolated modified Kneser-Ney n-gram LM (numpy, hashed n-grams)
  perplexity.py  training the perplexity model (`zerolm data train-ppl`): a char LM
                 for Chinese and a word LM for English in one file
  steps.py       the dataproc steps `langid`, `quality`, `perplexity` (columns
                 `language`, `quality_score`, `ppl`, `rarity`) and their configs
  stage.py       wiring into `zerolm data run`: model checks before the job, the
                 per-source percentile pass of the perplexity filter
  curriculum.py  `pack` ordering / bucketing by a score column; bucket weights of
                 mixture stages ("easy first", "high quality in the annealing stage")
  demo_models.py small versions of the three models from the demo corpus alone
  textprep.py, corpus.py, ftmodel.py, quantiles.py: shared helpers

Every model is one file that a worker loads once per process (ftmodel.load_*,
ngram.load_ngram cache by path, size and mtime). Nothing here imports ray except
stage.py and curriculum.py, which wire steps into Ray Data.
"""
