"""Ghost clipping for ``tf.keras.layers.Conv2D``: a fast-clipping registry function for TF Privacy 0.9.

TF Privacy's fast gradient clipping (``tensorflow_privacy.privacy.fast_gradient_clipping``) computes each
example's gradient norm from one forward and one backward pass, through a *layer registry*: for every layer
with trainable weights, a function returns the layer's pre-activation tensor ``Z`` (watched on the tape), the
layer's output, and ``sqr_norm_fn(dL/dZ)`` -> per-example squared norm of the layer's weight gradient. TF Privacy
0.9 registers Dense and Embedding only; this module adds Conv2D through the same API (``LayerRegistry.insert``)
and ``make_layer_registry()`` returns TF Privacy's default registry plus Conv2D.

The rule (Li et al. 2022, "Large language models can be strong differentially private learners"; Bu et al.
2022, "Scalable and efficient training of large convolutional neural networks with DP", mixed ghost clipping).
For one example, let ``U`` (T x p) be the unfolded input (one row per output position, ``T = H_out W_out``;
``p = k_h k_w C_in`` the receptive field) and ``G`` (T x d) the gradient
of the summed loss at the conv's pre-activation output (``d = filters``). Then

* kernel gradient ``U^T G`` (p x d), and its squared norm is either computed **directly**,
  ``||U^T G||_F^2`` (cost ~ T p d, memory p d per example), or by the **ghost norm**
  ``<U U^T, G G^T>`` = ``sum_{t,s} (u_t . u_s)(g_t . g_s)`` (cost ~ T^2 (p + d), memory T^2), without
  forming the gradient. Per layer, the cheaper one is chosen as Bu et al. do: ghost when ``2 T^2 < p d``.
* bias gradient ``sum_t g_t`` (d), squared norm added (kernel and bias are one layer's weights, as in
  TF Privacy's Dense rule).

The activation is handled as TF Privacy's Dense rule does: the layer is called with its activation switched
off to get ``Z``, and the activation is applied outside, so any activation works. Microbatches (``num_microbatches``)
concatenate the positions of a microbatch's examples (the norm of the microbatch's summed gradient); they use
the direct form, whose cost does not grow with the microbatch size.

Supported: channels_last, ``groups=1``, strides, ``padding`` same / valid, dilation (with stride 1, as Keras
allows). Anything else is refused by ``conv2d_supported`` (the trainer then takes the vectorized path) and, if
called anyway, by the registry function with one clear message.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

METHODS = ("auto", "ghost", "direct")


def conv2d_supported(layer) -> Optional[str]:
    """None when ``layer`` (a Conv2D) is covered by the rule, else the reason it is not."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"Conv2D layer {layer.name!r} uses data_format={layer.data_format!r}; only channels_last is supported"
    if int(getattr(layer, "groups", 1)) != 1:
        return f"Conv2D layer {layer.name!r} uses groups={layer.groups}; only groups=1 is supported"
    if str(layer.padding).lower() not in ("same", "valid"):
        return f"Conv2D layer {layer.name!r} uses padding={layer.padding!r}; only same/valid are supported"
    return None


def choose_method(positions: Optional[int], receptive: int, filters: int) -> str:
    """Bu et al.'s per-layer choice: the ghost norm when ``2 T^2 < p d`` (T output positions, p = receptive field
    size, d = filters), else the direct per-example gradient. Unknown T (dynamic spatial size): direct, whose
    memory does not depend on T."""
    if positions is None:
        return "direct"
    return "ghost" if 2 * positions * positions < receptive * filters else "direct"


def _unfold(tf, layer, x):
    """[B, H_out, W_out, C_in k_h k_w]: every output position's receptive field (the rows of U). A depthwise
    convolution with a one-hot kernel does the unfolding with the same strides / padding / dilation as the
    layer (several times faster on CPU than ``tf.image.extract_patches``). Its order, (C_in, k_h, k_w), differs
    from the kernel's (k_h, k_w, C_in) by a permutation of the p axis, which changes neither U U^T nor the
    Frobenius norm of U^T G."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    cin = int(x.shape[-1])
    one_hot = tf.reshape(tf.eye(kh * kw, dtype=x.dtype), [kh, kw, 1, kh * kw])
    return tf.nn.depthwise_conv2d(x, tf.tile(one_hot, [1, 1, cin, 1]), strides=[1, sh, sw, 1],
                                  padding=str(layer.padding).upper(), dilations=list(layer.dilation_rate))


def conv2d_layer_computation(layer_instance, input_args: Sequence[Any], input_kwargs: Mapping[str, Any],
                             tape, num_microbatches=None, *, method: str = "auto"):
    """TF Privacy registry function for ``tf.keras.layers.Conv2D`` (signature of
    ``type_aliases.RegistryFunction``): returns ``(Z, outputs, sqr_norm_fn)`` with ``Z`` the pre-activation
    output (watched on ``tape``) and ``sqr_norm_fn(dL/dZ)`` the per-example (or per-microbatch) squared norm
    of the kernel + bias gradient."""
    import tensorflow as tf

    if input_kwargs:
        raise ValueError("Conv2D layer calls should not receive kwargs.")
    if len(input_args) != 1:
        raise ValueError("Only Conv2D layer inputs of length 1 are permitted.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    reason = conv2d_supported(layer_instance)
    if reason:
        raise NotImplementedError(reason + "; use the vectorized DP path for this model.")
    x = input_args[0]
    orig_activation = layer_instance.activation
    layer_instance.activation = None
    try:
        base_vars = layer_instance(x)
    finally:
        layer_instance.activation = orig_activation
    tape.watch(base_vars)
    outputs = orig_activation(base_vars) if orig_activation else base_vars

    kh, kw = layer_instance.kernel_size
    filters = int(layer_instance.filters)
    receptive = kh * kw * int(x.shape[-1])
    h_out, w_out = base_vars.shape[1], base_vars.shape[2]
    positions = int(h_out) * int(w_out) if h_out is not None and w_out is not None else None
    chosen = method
    if chosen == "auto":
        chosen = "direct" if num_microbatches is not None else choose_method(positions, receptive, filters)
    use_bias = bool(layer_instance.use_bias)

    def sqr_norm_fn(grads):
        u = _unfold(tf, layer_instance, x)
        rows = tf.shape(grads)[0] if num_microbatches is None else tf.cast(num_microbatches, tf.int32)
        u = tf.reshape(u, tf.stack([rows, -1, receptive]))        # [B, T, p] (or [M, (B/M) T, p])
        g = tf.reshape(grads, tf.stack([rows, -1, filters]))      # [B, T, d]
        u = tf.cast(u, g.dtype)
        if chosen == "ghost":
            uut = tf.matmul(u, u, transpose_b=True)                # [B, T, T]
            ggt = tf.matmul(g, g, transpose_b=True)
            sq = tf.reduce_sum(uut * ggt, axis=[1, 2])
        else:
            per_example = tf.matmul(u, g, transpose_a=True)        # [B, p, d]: the per-example kernel gradient
            sq = tf.reduce_sum(tf.square(per_example), axis=[1, 2])
        if use_bias:
            sq += tf.reduce_sum(tf.square(tf.reduce_sum(g, axis=1)), axis=1)
        return sq

    return base_vars, outputs, sqr_norm_fn


def make_layer_registry(conv_method: str = "auto"):
    """TF Privacy's default fast-clipping registry (Dense, Embedding) plus Conv2D (this module's rule).
    ``conv_method`` forces the ghost or direct form for every Conv2D (tests, benchmarks); ``auto`` chooses per
    layer (``choose_method``)."""
    import functools

    import tensorflow as tf
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry

    if conv_method not in METHODS:
        raise ValueError(f"conv_method must be one of {METHODS}, got {conv_method!r}")
    registry = layer_registry.make_default_layer_registry()
    fn = conv2d_layer_computation if conv_method == "auto" else functools.partial(
        conv2d_layer_computation, method=conv_method)
    registry.insert(tf.keras.layers.Conv2D, fn)
    return registry


def unsupported_layers(model, registry=None) -> list:
    """Reasons why ``model`` cannot take the fast path with ``registry`` (default ``make_layer_registry()``):
    trainable layers outside the registry, and Conv2D layers whose configuration the rule does not cover.
    Empty when every trainable layer is covered. Layers without trainable weights (pooling, Flatten,
    Activation, Dropout, ...) are passed through by TF Privacy and need no rule."""
    import tensorflow as tf

    registry = registry or make_layer_registry()
    out = []
    for layer in model.layers:
        if not layer.trainable_variables:
            continue
        if not registry.is_elem(layer):
            out.append(f"layer {layer.name!r} ({layer.__class__.__name__}) is not in the fast-clipping registry")
        elif len(getattr(layer, "inbound_nodes", None) or ()) > 1:
            # A layer called more than once shares its weights between calls: its per-example gradient is the
            # sum over calls, whose norm the per-call rules do not give (they would under-estimate it).
            out.append(f"layer {layer.name!r} ({layer.__class__.__name__}) is called {len(layer.inbound_nodes)} "
                       "times (shared weights); the fast-clipping rules cover one call per layer")
        elif type(layer) is tf.keras.layers.Conv2D:
            reason = conv2d_supported(layer)
            if reason:
                out.append(reason)
    return out


__all__ = ["conv2d_layer_computation", "conv2d_supported", "choose_method", "make_layer_registry",
           "unsupported_layers", "METHODS"]
