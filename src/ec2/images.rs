//! This installation's baked images (`labbook image`): the builder instance they are made on,
//! and the images and snapshots themselves, found by their tags. Every call goes through
//! [`Ec2::call`] and so through the shared rate limit, with the same error sorting.

use aws_sdk_ec2::types::{Filter, Image, ResourceType};

use super::{
    Ec2, Ec2Error, InstanceInfo, LIVE_STATES, Offering, TAG_INSTALLATION, TAG_MANAGED, classify,
    info, ok, tag_filter, tag_specification,
};

/// What an image builder is tagged with, besides managed and installation.
pub const TAG_ROLE: &str = "labbook:role";
pub const ROLE_IMAGE_BUILDER: &str = "image-builder";
/// The labbook version that baked an image.
pub const TAG_VERSION: &str = "labbook:version";
/// What a baked image holds (`tljh,certbot <version>`).
pub const TAG_HOLDS: &str = "labbook:holds";

/// An image of this installation, as `DescribeImages` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    pub image_id: String,
    pub name: String,
    /// EC2's creation date (ISO 8601, UTC).
    pub created: String,
    /// `pending`, `available`, `failed`, …
    pub state: String,
    /// The labbook version that baked it (its `labbook:version` tag).
    pub version: Option<String>,
    /// Its `labbook:holds` tag.
    pub holds: Option<String>,
    /// The EBS snapshots behind it.
    pub snapshot_ids: Vec<String>,
}

fn image_info(i: &Image) -> Option<ImageInfo> {
    let tag = |key: &str| {
        i.tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    Some(ImageInfo {
        image_id: i.image_id()?.to_owned(),
        name: i.name().unwrap_or_default().to_owned(),
        created: i.creation_date().unwrap_or_default().to_owned(),
        state: i
            .state()
            .map_or("unknown".to_owned(), |s| s.as_str().to_owned()),
        version: tag(TAG_VERSION),
        holds: tag(TAG_HOLDS),
        snapshot_ids: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
            .collect(),
    })
}

impl Ec2 {
    /// The tags of this installation's image builder (instance and volume).
    fn builder_tags(&self) -> Vec<(&'static str, String)> {
        vec![
            (TAG_MANAGED, "true".to_owned()),
            (TAG_INSTALLATION, self.settings.installation.clone()),
            (TAG_ROLE, ROLE_IMAGE_BUILDER.to_owned()),
            (
                "Name",
                format!("labbook image builder ({})", self.settings.installation),
            ),
        ]
    }

    /// Launches the image builder from `base_ami_id` with `user_data`, as a slot's machine is
    /// launched (labbook's security group, the first subnet and instance type, IMDSv2
    /// required), tagged `labbook:role=image-builder`. `client_token` makes a retried call
    /// return the same instance.
    pub async fn launch_builder(
        &self,
        base_ami_id: &str,
        user_data: &str,
        client_token: &str,
    ) -> Result<String, Ec2Error> {
        let offering = Offering {
            instance_type: self.settings.instance_type.clone(),
            subnet_id: self.settings.subnet_id.clone(),
        };
        let tags = self.builder_tags();
        let request = self
            .run_request(base_ami_id, &offering, user_data, client_token, &tags)
            .await?;
        let out = self
            .call("RunInstances", || async {
                request
                    .clone()
                    .send()
                    .await
                    .map_err(|e| classify("RunInstances", e))
            })
            .await?;
        ok("RunInstances");
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or(Ec2Error::Transient {
                operation: "RunInstances",
                detail: "no instance in the answer".into(),
            })
    }

    /// This installation's image builders that are not terminated (left by a build that was
    /// interrupted, or the one of a build running now).
    pub async fn find_builders(&self) -> Result<Vec<InstanceInfo>, Ec2Error> {
        let filters = vec![
            tag_filter(TAG_MANAGED, "true"),
            tag_filter(TAG_INSTALLATION, &self.settings.installation),
            tag_filter(TAG_ROLE, ROLE_IMAGE_BUILDER),
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(LIVE_STATES.map(str::to_owned).to_vec()))
                .build(),
        ];
        Ok(self
            .instances_matching(filters)
            .await?
            .iter()
            .filter_map(info)
            .filter(|i| !i.is_gone())
            .collect())
    }

    /// Stops an instance (its EBS volumes stay, for an image to be made of them).
    pub async fn stop(&self, instance_id: &str) -> Result<(), Ec2Error> {
        self.call("StopInstances", || async {
            self.client
                .stop_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map_err(|e| classify("StopInstances", e))
        })
        .await?;
        ok("StopInstances");
        Ok(())
    }

    /// Makes an image of a (stopped) instance, named `name`, the image and its snapshots
    /// tagged `tags` as they are created. Returns its id; it is `pending` until EC2 has made it.
    pub async fn create_image(
        &self,
        instance_id: &str,
        name: &str,
        description: &str,
        tags: &[(&str, String)],
    ) -> Result<String, Ec2Error> {
        let out = self
            .call("CreateImage", || async {
                self.client
                    .create_image()
                    .instance_id(instance_id)
                    .name(name)
                    .description(description)
                    .tag_specifications(tag_specification(ResourceType::Image, tags))
                    .tag_specifications(tag_specification(ResourceType::Snapshot, tags))
                    .send()
                    .await
                    .map_err(|e| classify("CreateImage", e))
            })
            .await?;
        ok("CreateImage");
        out.image_id()
            .map(str::to_owned)
            .ok_or(Ec2Error::Transient {
                operation: "CreateImage",
                detail: "no image id in the answer".into(),
            })
    }

    /// This installation's images (owned by the account, tagged `labbook:managed` and with its
    /// `labbook:installation`), newest first.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, Ec2Error> {
        let filters = vec![
            tag_filter(TAG_MANAGED, "true"),
            tag_filter(TAG_INSTALLATION, &self.settings.installation),
        ];
        let mut images = self.describe_images(None, Some(filters)).await?;
        newest_first(&mut images);
        Ok(images)
    }

    /// One image of the account by id, if EC2 shows it.
    pub async fn image(&self, image_id: &str) -> Result<Option<ImageInfo>, Ec2Error> {
        match self.describe_images(Some(image_id), None).await {
            Ok(images) => Ok(images.into_iter().next()),
            // Not visible yet (EC2's reads are eventually consistent), or gone.
            Err(err) if err.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn describe_images(
        &self,
        image_id: Option<&str>,
        filters: Option<Vec<Filter>>,
    ) -> Result<Vec<ImageInfo>, Ec2Error> {
        let request = self
            .client
            .describe_images()
            .owners("self")
            .set_image_ids(image_id.map(|id| vec![id.to_owned()]))
            .set_filters(filters);
        let mut out = Vec::new();
        let mut next_token = None;
        loop {
            let page = self
                .call("DescribeImages", || {
                    let request = request.clone().set_next_token(next_token.clone());
                    async move {
                        request
                            .send()
                            .await
                            .map_err(|e| classify("DescribeImages", e))
                    }
                })
                .await?;
            out.extend(page.images().iter().filter_map(image_info));
            next_token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next_token.is_none() {
                break;
            }
        }
        ok("DescribeImages");
        Ok(out)
    }

    /// Deregisters an image (its snapshots stay until deleted); one already gone is fine.
    pub async fn deregister_image(&self, image_id: &str) -> Result<(), Ec2Error> {
        let done = self
            .call("DeregisterImage", || async {
                self.client
                    .deregister_image()
                    .image_id(image_id)
                    .send()
                    .await
                    .map_err(|e| classify("DeregisterImage", e))
            })
            .await;
        match done {
            Ok(_) => {}
            Err(err) if err.code() == Some("InvalidAMIID.NotFound") => {}
            Err(err) => return Err(err),
        }
        ok("DeregisterImage");
        Ok(())
    }

    /// Deletes a snapshot; one already gone is fine.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), Ec2Error> {
        let done = self
            .call("DeleteSnapshot", || async {
                self.client
                    .delete_snapshot()
                    .snapshot_id(snapshot_id)
                    .send()
                    .await
                    .map_err(|e| classify("DeleteSnapshot", e))
            })
            .await;
        match done {
            Ok(_) => {}
            Err(err) if err.code() == Some("InvalidSnapshot.NotFound") => {}
            Err(err) => return Err(err),
        }
        ok("DeleteSnapshot");
        Ok(())
    }
}

/// Sorts images newest first: by EC2's creation date, then by name (labbook's names end with
/// the build's time).
pub fn newest_first(images: &mut [ImageInfo]) {
    images.sort_by(|a, b| (&b.created, &b.name).cmp(&(&a.created, &a.name)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, created: &str, name: &str) -> ImageInfo {
        ImageInfo {
            image_id: id.into(),
            name: name.into(),
            created: created.into(),
            state: "available".into(),
            version: None,
            holds: None,
            snapshot_ids: Vec::new(),
        }
    }

    #[test]
    fn images_sort_newest_first() {
        let mut images = vec![
            image(
                "ami-1",
                "2026-12-01T10:00:00.000Z",
                "labbook-x-20261201T100000Z",
            ),
            image(
                "ami-3",
                "2026-12-03T10:00:00.000Z",
                "labbook-x-20261203T100000Z",
            ),
            image(
                "ami-2",
                "2026-12-01T10:00:00.000Z",
                "labbook-x-20261201T100001Z",
            ),
        ];
        newest_first(&mut images);
        let ids: Vec<&str> = images.iter().map(|i| i.image_id.as_str()).collect();
        assert_eq!(ids, ["ami-3", "ami-2", "ami-1"]);
    }
}
