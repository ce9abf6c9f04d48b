"""adapt: adapt small InternVL vision-language models to a domain.

Data flows one way: source -> records (formatters/) -> mixture (adapt.mixing) -> samples
(adapt.samples) -> batches (adapt.batching) -> model (adapt.models) -> checkpoint (adapt.training,
adapt.export).
"""

__version__ = "0.1.0"
