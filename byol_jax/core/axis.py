"""The name of the device-mesh axis the batch is split over.

Core's steps use it in their collectives (pmean, psum); runtime/parallel.py builds the mesh with
it; evaluation's steps use it too. It lives in the lowest layer that needs it.
"""

AXIS = 'data'
