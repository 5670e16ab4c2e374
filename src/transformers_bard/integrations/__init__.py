"""Integrations with evaluation harnesses. Each module imports its harness lazily (none is a dependency of the
package); `lmms_eval` is the `lmms_eval.models` entry point of the `lmms` extra."""
