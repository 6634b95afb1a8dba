"""The `kubernetes` engine: warm pools of runtime pods per runtime, handed to functions, plus a pod per
execution for image functions (kubernetes-asyncio is imported only when this engine is loaded)."""

from engine.kubernetes.engine import KubernetesEngine

__all__ = ["KubernetesEngine"]
