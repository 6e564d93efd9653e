"""DICOM network node: SCP (C-ECHO, C-STORE), SCU sender, durable storage, study completion.

Never imports :mod:`worker`, :mod:`model` or :mod:`training`; stored instances and completed studies are
reported through the callback protocol in :mod:`dicom_node.events`.
"""
