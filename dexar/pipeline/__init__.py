"""The Lightning and experiment pipeline around the method library.

The explainer module, evaluation, resumable runs, the Shapes fit, the experiment grid, the ``dexar``
command and the report.
"""
