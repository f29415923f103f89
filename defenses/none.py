"""The undefended baseline: plaintext channel, nothing added. Every other defense is compared to it."""

from suite.interfaces.defense import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    pass
