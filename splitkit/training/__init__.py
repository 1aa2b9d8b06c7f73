"""The client's half of split learning: a Learner that trains its Bottom and Top through a trunk server (or
unsplit, the reference), generation through the split, the defences a client applies to what it sends, the
adapter a run saves, data files, and the reference gradients every check compares with (`testing`).

It imports the core and the wire. The defences sit here, not with the attacks in `privacy`, because the Learner
applies them to each tensor before it is sent; the trunk server (`trunk`) is beside this layer, and neither
imports the other.
"""
