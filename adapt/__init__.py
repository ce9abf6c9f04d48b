"""adapt: adapt small InternVL vision-language models to a domain.

Data flows one way: source -> records (formatters/) -> mixture (adapt.data.mixing) -> samples
(adapt.data.samples) -> batches (adapt.data.batching) -> model (adapt.checkpoints.models) -> checkpoint (adapt.training.trainer,
adapt.checkpoints.export).
"""

__version__ = "0.1.0"
