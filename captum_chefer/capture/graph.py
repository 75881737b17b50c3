"""Which captured attention calls the explained output depends on, read off the autograd graph.

The rules assume things about the model that can be checked cheaply once the forward has run:
every captured call should lie on a path from the explained output back to the inputs, and the
self-attention rule assumes the calls form one chain, each layer computed from the previous
one. Both are questions about the autograd graph, answered here in one pass over it. The pass
is linear in the number of graph nodes, which grows with the number of layers, not with the
sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor
from torch.autograd.graph import Node


@dataclass(frozen=True)
class Dependencies:
    """The captured calls reachable from the output, and which calls each one depends on.

    Attributes:
        on_path: indexes (forward order) of the calls the output depends on.
        below: for each call on the path, the indexes of the captured calls its inputs depend on.
    """

    on_path: tuple[int, ...]
    below: dict[int, frozenset[int]]

    def chain_breaks(self) -> list[tuple[int, int]]:
        """Consecutive calls ``(a, b)`` on the path where call ``b`` does not depend on ``a``.

        Example:
            >>> below = {0: frozenset(), 1: frozenset({0}), 2: frozenset()}
            >>> Dependencies((0, 1, 2), below).chain_breaks()
            [(1, 2)]
        """
        pairs = zip(self.on_path, self.on_path[1:])
        return [(a, b) for a, b in pairs if a not in self.below[b]]

    def components(self) -> list[list[int]]:
        """The calls on the path grouped into independent sets (towers): two calls are in one
        set when one depends on the other, directly or through others; sets in forward order.

        Example:
            >>> below = {0: frozenset(), 1: frozenset(), 2: frozenset({0}), 3: frozenset({1})}
            >>> Dependencies((0, 1, 2, 3), below).components()
            [[0, 2], [1, 3]]
        """
        group = {call: call for call in self.on_path}

        def root(call: int) -> int:
            while group[call] != call:
                group[call] = group[group[call]]
                call = group[call]
            return call

        for call in self.on_path:
            for other in self.below[call]:
                if other in group:
                    group[root(other)] = root(call)
        found: dict[int, list[int]] = {}
        for call in self.on_path:
            found.setdefault(root(call), []).append(call)
        return sorted(found.values())


def dependencies(output: Tensor, nodes: Sequence[Node | None]) -> Dependencies:
    """Which of the captured calls, whose autograd ``nodes`` are given in forward order,
    ``output`` depends on, and on which captured calls each of those depends.

    Args:
        output: the explained output (it must require grad).
        nodes: the autograd node of each captured call's output (None for a call that does
            not require grad).

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> a = x * 2
        >>> b = a + 1
        >>> c = x * 3
        >>> deps = dependencies(b.sum(), [a.grad_fn, b.grad_fn, c.grad_fn])
        >>> deps.on_path, sorted(deps.below[1])
        ((0, 1), [0])
    """
    return dependencies_and_masks(output, nodes)[0]


def dependencies_and_masks(
    output: Tensor, nodes: Sequence[Node | None]
) -> tuple[Dependencies, dict[Node, int]]:
    """:func:`dependencies`, and for every node of the graph the ``nodes`` below it (a bit
    mask over their indexes): what lies above a call is what the model computes from it.

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> a = x * 2
        >>> b = a + 1
        >>> _, masks = dependencies_and_masks(b.sum(), [a.grad_fn])
        >>> masks[b.grad_fn], masks[a.grad_fn]
        (1, 0)
    """
    index = {node: i for i, node in enumerate(nodes) if node is not None}
    below: dict[Node, int] = {}
    root = output.grad_fn
    if root is None:
        return Dependencies((), {}), {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in below:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in below)
            continue
        mask = 0
        for child in children:
            mask |= below[child]
            if child in index:
                mask |= 1 << index[child]
        below[node] = mask
    reach = below[root] | (1 << index[root] if root in index else 0)
    on_path = tuple(i for i in range(len(nodes)) if reach >> i & 1)
    found = Dependencies(
        on_path,
        {i: _bits(below[nodes[i]]) for i in on_path},  # type: ignore[index]
    )
    return found, below


def mixing_outside_attention(found: Dependencies, n_calls: int) -> frozenset[int]:
    """Of the nodes ``n_calls`` on (token-mixing operations, after the attention calls ``0 ..
    n_calls - 1``), the indexes of those on the path that lie below no first attention layer.

    A first layer is a call on the path that depends on no other call. What lies below one
    takes part in making its tokens (a patch or positional convolution); everything else on the
    path mixes tokens after, or beside, the first layer.

    Example:
        >>> below = {0: frozenset({2}), 1: frozenset({0, 2}), 2: frozenset(), 3: frozenset({0})}
        >>> sorted(mixing_outside_attention(Dependencies((0, 1, 2, 3), below), 2))
        [3]
    """
    calls = [i for i in found.on_path if i < n_calls]
    first = [i for i in calls if not any(j < n_calls for j in found.below[i])]
    making = frozenset().union(*(found.below[i] for i in first))
    return frozenset(i for i in found.on_path if i >= n_calls and i not in making)


def reached_past_scores(output: Tensor, attention: dict[Node, tuple[int, ...]]) -> set[Node]:
    """The nodes ``output`` reaches along paths that carry token content, not attention scores.

    ``attention`` maps each captured call's node to the positions of its inputs that carry
    content (the values of a kernel call; none for probabilities, whose inputs are the scores).
    Mixing that only shapes the scores (a convolution on the keys) changes ``A``, which the rule
    reads as it is; mixing on these paths moves content from token to token.

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> scores = x * 2
        >>> probs = scores.softmax(0)
        >>> reached = reached_past_scores((probs * x).sum(), {probs.grad_fn: ()})
        >>> scores.grad_fn in reached, probs.grad_fn in reached
        (False, True)
    """
    seen: set[Node] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        children = node.next_functions
        if node in attention:
            children = tuple(children[i] for i in attention[node] if i < len(children))
        stack.extend(child for child, _ in children)
    return seen


def scores_below(probs: Sequence[Node], products: set[Node], depth: int = 6) -> set[Node]:
    """The ``products`` that make the scores of the softmaxes whose captured nodes are
    ``probs``: those found within ``depth`` steps below one, not past another product.

    A scores product ``Q K^T`` that the model also uses elsewhere (a sink's log-sum-exp over
    the same scores, which scales the output) shapes the attention only; a product with no
    softmax above it (linear attention) is not among these.

    Example:
        >>> import torch
        >>> q = torch.ones(1, 2, 3, requires_grad=True)
        >>> scores = q @ q.transpose(1, 2)
        >>> probs = (scores * 0.5).softmax(-1)
        >>> scores_below([probs.grad_fn], {scores.grad_fn}) == {scores.grad_fn}
        True
    """
    found: set[Node] = set()
    stack = [(node, 0) for node in probs]
    seen: set[Node] = set()
    while stack:
        node, steps = stack.pop()
        if node in seen or steps > depth:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child in products:
                found.add(child)
            else:
                stack.append((child, steps + 1))
    return found


def _bits(mask: int) -> frozenset[int]:
    return frozenset(i for i in range(mask.bit_length()) if mask >> i & 1)
