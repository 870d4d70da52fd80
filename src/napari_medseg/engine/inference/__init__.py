"""Inference wing: tile grid and plan, tile predictor, output writer, post-processing.

``predict_iter`` is the generator every interface runs; ``predict`` drains it. Importing this
package imports numpy but not torch (torch is imported when a run starts).
"""

from .pipeline import OutOfMemory, PredictionResult, predict, predict_iter
from .planning import plan_prediction

__all__ = ["OutOfMemory", "PredictionResult", "plan_prediction", "predict", "predict_iter"]
