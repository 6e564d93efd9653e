"""FHIR R4 resources, transaction Bundle and delivery client."""
