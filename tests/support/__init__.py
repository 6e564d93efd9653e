"""Test helpers shared by several suites: real peers (Orthanc) and process management."""
