"""``python -m resnet_deploy.cli``: the same as the ``resnet-deploy`` script."""

from ..__main__ import run

run()
