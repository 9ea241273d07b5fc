"""Test helpers shared by the test modules: small real model directories, loopback servers, MLflow."""
