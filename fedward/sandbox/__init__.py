"""The sandbox of the Flower processes: private network and PID namespaces reached only
through Unix-socket relays (:mod:`fedward.sandbox.netns`, :mod:`fedward.sandbox.relay`).

Standard library only: the sandbox may run on an interpreter without the appliance's
dependencies.
"""
