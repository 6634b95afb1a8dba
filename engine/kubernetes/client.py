"""Connecting to the Kubernetes API from [kubernetes] options: kubeconfig, kube_host with certificates
(Qinling's options), or in-cluster service-account config."""

from __future__ import annotations

import logging
import os

from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config

from router.config import Section

LOG = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:8001"  # `kubectl proxy`, Qinling's default kube_host


async def api_client(options: Section) -> client.ApiClient:
    configuration = client.Configuration()
    if options.kubeconfig:
        await kube_config.load_kube_config(config_file=str(options.kubeconfig), client_configuration=configuration)
        source = f"kubeconfig {options.kubeconfig}"
    elif options.kube_host:
        configuration.host = options.kube_host.rstrip("/")
        if options.use_api_certificate:
            if options.ssl_ca_cert:
                configuration.ssl_ca_cert = str(options.ssl_ca_cert)
            if options.cert_file:
                configuration.cert_file = str(options.cert_file)
            if options.key_file:
                configuration.key_file = str(options.key_file)
        else:
            configuration.verify_ssl = False
        source = f"kube_host {configuration.host}"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        kube_config.load_incluster_config(client_configuration=configuration)
        source = "in-cluster service account"
    else:
        configuration.host = DEFAULT_HOST
        source = f"default {DEFAULT_HOST}"
    LOG.info("kubernetes engine connects to %s (%s)", configuration.host, source)
    return client.ApiClient(configuration)
