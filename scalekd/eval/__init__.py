"""COCO metrics, model prediction and speed, and the visual report."""
