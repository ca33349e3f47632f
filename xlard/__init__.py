"""xlard: self-corrected image generation with explainable latent rewards (xLARD).

Layers, bottom up: ``xlard.ops`` (kernels + references), the method (prompts,
attention capture, rewards, corrector, projector, LAM), backbones, training,
evaluation, explanation, CLI. ``import xlard`` is cheap: submodules load on use.
"""
__version__ = "0.1.0"
