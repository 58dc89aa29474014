"""Core layer: networks, optimizers, schedules, target EMA, the BYOL step. No TensorFlow;
imports nothing from data/, evaluation/ or runtime/.
"""
