"""The data contract (records, images, boxes) and the data path: tiling, templates, samples, batches, mixing."""
