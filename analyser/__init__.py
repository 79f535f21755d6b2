"""The analyser: stored frames -> flow records, classifier verdicts, flags, reports.

Pipeline (one process, one core): ``reader`` follows the ``frames`` collection
(or a pcap), ``parse`` turns each frame into a small tuple, ``flows`` keeps the
per-connection context and writes flow records, the classifiers named by the
``policy`` turn packets into verdicts, ``flags`` writes the verdicts the
controller enforces, ``report`` shows what happened. ``engine`` ties them
together so that the live service and ``analyse --pcap`` run the same code.
"""
