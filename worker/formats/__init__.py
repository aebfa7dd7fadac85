"""Reading and writing the user's files: models (:mod:`.models`) and data (:mod:`.data`).

Every file here is untrusted. Nothing is unpickled unless the operator opted in
(``allow_unsafe_pickle``); archives are read member by member in memory, never extracted by name.
"""
