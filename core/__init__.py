"""Core of superweights: the plan (pure layout), the SuperWeight bank that generates slot weights,
slot inventory/binding on any torch module, and FLOP counting. Imports only torch, numpy, stdlib."""
