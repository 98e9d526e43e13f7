"""A NumPy float64 transcription of mit-han-lab/llm-awq's search, for the AWQ tests.

Written from llm-awq's ``awq/quantize/auto_scale.py`` (``_search_module_scale``, ``apply_scale``)
and ``auto_clip.py`` (``auto_clip_layer``, ``apply_clip``), in torch's weight layout
``(out, in)`` as there, independently of epmq_jax. The one deliberate difference: the quantizer
(llm-awq's ``pseudo_quantize_tensor``) is the project's grid, GPTQ's min-max with 0 in the range
(:func:`pseudo_quantize`), because that is the grid every row of the results table uses.

A range clipped to ``±m`` puts the zero point at exactly ``maxq / 2`` (and the clipped values at
half a step): a tie that float64 here, float32 in XLA and float16 in llm-awq each break by the
last bits of ``m``. So two faithful implementations pick other clipping bounds for some
(group, channel) pairs; compare clipping results through their errors, not their codes.
"""

import numpy as np


def pseudo_quantize(w, bits, group_size):
    """Fake-quantizes torch-layout ``w (out, in)`` in groups of ``group_size`` along ``in``."""
    shape = w.shape
    w = w.reshape(-1, group_size if group_size > 0 else shape[-1])
    hi = np.maximum(w.max(axis=1, keepdims=True), 0.0)
    lo = np.minimum(w.min(axis=1, keepdims=True), 0.0)
    empty = (hi == 0) & (lo == 0)
    hi, lo = np.where(empty, 1.0, hi), np.where(empty, -1.0, lo)
    maxq = 2 ** bits - 1
    scales = (hi - lo) / maxq
    zeros = np.clip(np.round(-lo / scales), 0, maxq)
    return ((np.clip(np.round(w / scales) + zeros, 0, maxq) - zeros) * scales).reshape(shape)


def act_scale(x):
    """``get_act_scale``: mean |x| per input channel over all tokens."""
    return np.abs(x).reshape(-1, x.shape[-1]).mean(0)


def search_module_scale(module, weights, x, bits, group_size, n_grid=20):
    """``_search_module_scale``: the best ratio for the layers ``weights`` (a dict name -> torch-layout
    weight) feeding ``module(weights, x)``, the others of the module in float.

    Returns:
      ``(best_ratio, best_scales, history)``.
    """
    org_out = module(weights, x)
    x_max = act_scale(x)
    best_error, best_ratio, best_scales, history = np.inf, -1, None, []
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = np.maximum(x_max ** ratio, 1e-4).reshape(-1)
        scales = scales / np.sqrt(scales.max() * scales.min())
        trial = {k: pseudo_quantize(w * scales.reshape(1, -1), bits, group_size) / scales.reshape(1, -1)
                 for k, w in weights.items()}
        loss = np.mean((org_out - module(trial, x)) ** 2)
        history.append(loss)
        if loss < best_error:
            best_error, best_ratio, best_scales = loss, ratio, scales
    assert best_ratio != -1, history
    return best_ratio, best_scales, history


def auto_clip_layer(w, input_feat, bits, group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """``auto_clip_layer``: the best clipping bound ``(out, n_group, 1)`` of torch-layout ``w``."""
    co = w.shape[0]
    group_size = group_size if group_size > 0 else w.shape[1]
    input_feat = input_feat.reshape(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    input_feat = input_feat[:, 0::input_feat.shape[1] // n_sample_token]
    w = w.reshape(co, 1, -1, group_size)
    org_max_val = np.abs(w).max(axis=-1, keepdims=True)
    best_max_val = org_max_val.copy()
    min_errs = np.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(axis=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = np.clip(w, -max_val, max_val)
        q_w = pseudo_quantize(cur_w, bits, group_size)
        cur_out = (input_feat * q_w).sum(axis=-1)
        err = ((cur_out - org_out) ** 2).mean(axis=1).reshape(min_errs.shape)
        better = err < min_errs
        min_errs[better] = err[better]
        best_max_val[better] = max_val[better]
    return best_max_val.squeeze(1)


def clip_errors(w, q, input_feat, group_size, n_sample_token=512):
    """``auto_clip_layer``'s error of a candidate ``q`` for ``w`` (both torch layout), per (out, group)."""
    co = w.shape[0]
    x = input_feat.reshape(-1, input_feat.shape[-1])
    x = x.reshape(1, x.shape[0], -1, group_size)
    x = x[:, 0::x.shape[1] // n_sample_token]
    w, q = w.reshape(co, 1, -1, group_size), q.reshape(co, 1, -1, group_size)
    return (((x * q).sum(-1) - (x * w).sum(-1)) ** 2).mean(axis=1)


def apply_clip(w, max_val):
    """``apply_clip``: clamps torch-layout ``w`` per (out, group)."""
    shape = w.shape
    w = w.reshape(*max_val.shape[:2], -1)
    return np.clip(w, -max_val, max_val).reshape(shape)
