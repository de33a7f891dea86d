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
"""monai_condflow.networks.nets."""

from .acgan import ACGANDiscriminator as ACGANDiscriminator
from .acgan import ACGANGenerator as ACGANGenerator
from .conditional_glow import ConditionalGlow as ConditionalGlow
from .counterfactual import class_centroids as class_centroids
from .counterfactual import nearest_of_class as nearest_of_class
from .counterfactual import restrict_change as restrict_change
from .counterfactual import target_conditions as target_conditions
from .flow_export import FlowDecoder as FlowDecoder
from .flow_export import FlowLogProb as FlowLogProb
from .flow_sampler import FlowSampler as FlowSampler
from .pepx_net import PEPXNet as PEPXNet
from .pepx_net import PEPXStage as PEPXStage
from .projection_discriminator import ProjectionDiscriminator as ProjectionDiscriminator
