"""The science pipelines: plain functions over numpy/astropy, one module per stage.

Prompt Processing (:mod:`ldf.prompt`) and batch campaigns run the same code; the
``lsst.pipe.base`` PipelineTask wrappers live in :mod:`ldf.pipelines.tasks`. Shared
containers are in :mod:`ldf.pipelines.types`.
"""
