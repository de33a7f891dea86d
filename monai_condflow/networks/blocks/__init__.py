# Copyright (c) monai_condflow contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""monai_condflow.networks.blocks."""

from .actnorm import ActNorm as ActNorm
from .coupling import ConditionalAffineCoupling as ConditionalAffineCoupling
from .coupling import ConditionalCouplingNet as ConditionalCouplingNet
from .coupling import ConditionalFlowStep as ConditionalFlowStep
from .flow_sequential import FlowLayer as FlowLayer
from .flow_sequential import FlowSequential as FlowSequential
from .invertible_conv import InvertibleConv1x1 as InvertibleConv1x1
from .latent_prior import FittedLatentPrior as FittedLatentPrior
from .latent_prior import LatentMoments as LatentMoments
from .multiscale import ConditionalTopPrior as ConditionalTopPrior
from .multiscale import FineGrainedLevel as FineGrainedLevel
from .multiscale import FineGrainedSplit as FineGrainedSplit
from .pepx import PEPXBlock as PEPXBlock
from .pepx import make_norm_layer as make_norm_layer
from .squeeze import HaarSqueeze as HaarSqueeze
from .squeeze import Squeeze as Squeeze
