"""Scheduling: admission, dispatch into the pipeline, routing of results."""

from .service import SchedulingService as SchedulingService
