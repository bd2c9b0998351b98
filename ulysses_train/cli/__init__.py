"""Everything that parses argv, talks to Hydra, prints and exits: the train, eval, export and plan
entry points and their input checks.
"""
