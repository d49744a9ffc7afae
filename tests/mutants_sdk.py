"""Weakenings of the emulator's wire formats that Microsoft's own SDKs must catch (run by `make mutants`, which
passes AZUREML_CORE_PYTHON and AZURE_AI_ML_PYTHON to the tests)."""

from tests.mutation import Mutant

CONTROL = "proxy/emulator/control.py"
_T = "tests/test_sdk_clients.py::"
_V1 = _T + "test_azureml_core_reads_the_v1_control_plane_and_scores_through_the_proxy"
_V2 = _T + "test_azure_ai_ml_reads_the_v2_control_plane"

MUTANTS = [
    Mutant(
        name="v1 service object without createdTime (azureml-core: Invalid AKS Webservice payload)",
        path=CONTROL,
        old='        "createdTime": created,\n',
        new="",
        tests=(_V1,),
    ),
    Mutant(
        name="workspace discovery without the studio key that azureml-core looks up",
        path=CONTROL,
        old='    "studio",\n',
        new="",
        tests=(_V1,),
    ),
    Mutant(
        name="no deployments listing for a v2 endpoint (azure-ai-ml's online_endpoints.get lists them)",
        path=CONTROL,
        old='    app.router.add_get(V2_WORKSPACE + "/onlineEndpoints/{name}/deployments", _v2_deployment_list)\n',
        new="",
        tests=(_V2,),
    ),
]
